def get_config(arg=None):
  c = ml_collections.ConfigDict(
  return c
