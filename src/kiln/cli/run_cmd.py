from kiln.core.errors import KilnError
def register(sub):  # placeholder until the runner lands
    pass
