"""Stage 3, normalize: a profile's signals compiled into writers of one typed pack model."""
