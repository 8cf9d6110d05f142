"""Reference data sets that ship with Hyprstream (small, offline)."""
