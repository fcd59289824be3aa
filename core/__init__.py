"""fleetpush: real-time push and device monitoring for robot fleets."""

__version__ = "0.1.0"
