"""What agents report and where: the telemetry and status records with their wire form
(:mod:`~hyprstream.telemetry.records`) and the broker settings (:mod:`~hyprstream.telemetry.broker`).
The agent publishes, the fog's fleet view and selection read: the package stands below both."""
