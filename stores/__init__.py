"""Content-addressed image stores and the sources they pull from."""
