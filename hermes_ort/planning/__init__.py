"""Deciding how: profiles measured or estimated, the planner, generation plans."""
