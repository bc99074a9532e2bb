"""One module per DAG stage, each ``run(params[, method])``, except ``train``: one module for the three
training stages, ``run(params, method, stage)``; the table is ``dcm.pipeline.table``."""
