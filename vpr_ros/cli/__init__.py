"""The ``vpr`` command line tool."""
