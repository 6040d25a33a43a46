"""Task suites on Parquet: the format, validation and generators."""
