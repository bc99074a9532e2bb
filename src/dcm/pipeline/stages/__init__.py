"""One module per DAG stage, each ``run(params[, method])``; the table is ``dcm.pipeline.table``."""
