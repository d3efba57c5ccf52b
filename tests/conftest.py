pytest_plugins = ["cluster_plugin"]
