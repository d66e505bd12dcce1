"""The child side of sandboxd: one module per kernel subsystem, applied from a resolved Plan."""
