"""The antenna daemon: takes users' jobs, places them on the best hub, forwards them and follows them."""
