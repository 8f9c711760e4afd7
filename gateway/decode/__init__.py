"""Stage 2, decode: DBC files parsed by cantools, described as bit layouts for the generator."""
