"""The edge agent: device profiles, resource policy, inference, local training and telemetry.

Import the parts from their modules, e.g. ``from hyprstream.agent.profile import load_profile``;
this package module stays light, so importing one part never pulls in the heavy dependencies of
another. The modules, one concept each:

``profile``      device profiles (TOML) as frozen, validated objects
``monitor``      resource samples (records in :mod:`hyprstream.telemetry.records`): psutil and NVML, traces
``policy``       the adaptive strategy (full / hybrid / minimal) with hysteresis and dwell; train and
                 inference plans
``publisher``    telemetry over MQTT (paho: Last Will, retained status, backoff, offline buffer) or in memory
``ingest``       ingestion sources: watched directories, HTTP on loopback, a Unix socket, MQTT topics
``pipeline``     records in -> store -> inference -> predictions
``batching``     dynamic batching of inference requests
``export``       a global model version to ONNX (fp32 and int8), in a child process
``inference``    the inference engine on ONNX Runtime (CUDA or CPU, fp32 or int8) with a torch fallback
``offload``      the client of the fog's inference offload endpoint
``client_app``   the Flower ClientApp (simulator and devices alike); it trains with :mod:`hyprstream.learning`
``executor``     the warm executor: the SuperNode's ClientApp tasks in forks of one pre-imported process
``handoff``      what the daemon and the ClientApp processes share through the state directory
``daemon``       ``agent run``: the long-lived process
``cli``          the ``agent`` subcommands
"""
