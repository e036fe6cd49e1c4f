"""Runnable examples; a package so that tests can import them (``examples.rendezvous_demo``)."""
