"""A discrete-event simulator of a DualPath cluster that decides with the real policies (docs/SIM.md)."""
