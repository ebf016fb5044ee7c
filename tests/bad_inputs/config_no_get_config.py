"""No get_config here."""

VALUE = 3
