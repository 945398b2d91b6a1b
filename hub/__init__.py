"""The hub daemon: advertises a hosting site's capacity and runs forwarded jobs on its scheduler."""
