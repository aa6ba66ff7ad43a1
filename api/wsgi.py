"""The WSGI entry point gunicorn serves: `gunicorn api.wsgi:app`."""

from api import create_app
from shared import logs
from shared.config import get_settings

logs.configure(get_settings().log_level, get_settings().log_format)
app = create_app()
