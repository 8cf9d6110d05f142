"""Core's API as both sides speak it: the records (:mod:`~hyprstream.coreapi.records`), the Flight
commands and their wire form (:mod:`~hyprstream.coreapi.commands`) and the client
(:mod:`~hyprstream.coreapi.client`). Core serves it; fogs, the simulator and operators' scripts call
it. It stands on the shared floor so that neither tier imports the other."""
