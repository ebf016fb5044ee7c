def get_config(arg=None):
  raise RuntimeError("oops")
