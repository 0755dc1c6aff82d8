"""The application, apart from the library: the ``lanczos-grad-gp`` CLI, the training loop, data sets."""
