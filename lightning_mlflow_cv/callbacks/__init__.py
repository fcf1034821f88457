"""The plugin's callbacks, one per module."""

__all__: list[str] = []
