"""The stage functions: one module per verb (surgery, merge with its greedy soup, train,
evaluate, export, generate, inspect, verify), each one function that takes a typed request
and returns a typed result.

The commands of :mod:`lmexpand.cli` parse their flags into a request, call the function and
print the result; :mod:`lmexpand.recipe` builds a typed job from a YAML file and runs its
stages through the same functions, so a recipe can do whatever a command can. This package
sits below the CLI and the recipe and above the libraries (expand, train, eval, export).
"""
