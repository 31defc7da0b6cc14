"""Who a caller is and what it may do, below the HTTP layer: principals, roles and lane grants
(`access/principal.py`), API keys and JWTs (`access/keys.py`).

Imports config/ and tasks/ only (never api/, workers/ or Flask): the API's HTTP authentication (api/auth.py), the
admin CLI (`manage.py auth`) and work that outlives its request (a batch's owner) all ask it the same questions."""
