"""The OpenAI Files and Batch product below the HTTP layer: uploaded files and their lines (files.py), every batch's
state in Redis (store.py), and the batch driver process that moves each batch forward (driver.py, `manage.py
batches`; its validation, line submission and answer files in validation.py, lines.py and outputs.py; how many
lines a device takes in lanes.py; a new batch in creation.py). The HTTP views are api/blueprints/files.py and
api/blueprints/batches.py.

May import config/, tasks/, access/, protocols/, submission/ and webhooks/; never api, flask, flask_smorest or
workers: the driver submits a line through the one submission use case, built in this process as an API process
builds it (services.py, submission/wiring.py).
"""
