"""User-facing errors: one line saying what is wrong and how to fix it.

``UserInputError`` derives from ``SystemExit`` so that, raised inside ``nnUNetv2_train`` or our
CLI, Python prints only the message (no traceback from deep inside nnU-Net) and exits with 1.
Library callers can still catch it.
"""


class UserInputError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"nnunet-topomae: {message}")
        self.message = message

    def __str__(self) -> str:
        return str(self.code)
