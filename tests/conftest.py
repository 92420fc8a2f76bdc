pytest_plugins = ["dalle_flax.testing.pytest_plugin"]
