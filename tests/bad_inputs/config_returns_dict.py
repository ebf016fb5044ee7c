def get_config(arg=None):
  return {"model": {"d_model": 64}}
