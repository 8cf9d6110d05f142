"""The simulation harness behind ``hyprstream simulate``: whole fleets on one machine."""
