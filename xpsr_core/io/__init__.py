"""On-disk formats: shard naming, webdataset tars, atomic writes, done markers, Parquet indexes."""
