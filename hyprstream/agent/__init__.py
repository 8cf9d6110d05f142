"""The edge agent: device profiles, resource policy, inference, local training and telemetry.

Import the parts from their modules, e.g. ``from hyprstream.agent.profile import load_profile``;
this package module stays light, so importing one part never pulls in the heavy dependencies of
another.
"""
