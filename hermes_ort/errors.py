"""The few error types users catch: everything the runtime raises on bad input is a HermesError."""


class HermesError(Exception):
    """Base of every error hermes_ort raises on purpose."""


class ManifestError(HermesError):
    """A model directory or its manifest.json is missing, corrupt or inconsistent."""


class InputError(HermesError):
    """A caller's input does not match what the manifest declares."""


class StageError(HermesError):
    """A stage failed to load or run; the message names the stage and its file."""


class BudgetError(HermesError):
    """The memory budget cannot be met by any plan."""


class SplitError(HermesError):
    """An ONNX graph cannot be cut into stages as asked."""
