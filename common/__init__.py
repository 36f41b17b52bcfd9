"""What gateway and worker share: the wire protocol, Redis key names, settings, model files and
the `spindle` CLI. Imports neither gateway nor worker."""
