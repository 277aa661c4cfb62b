"""Ready-made study configs: Python files with `get_config()`.

In the installed package they are `fedjax_dx.configs` (the wheel maps this folder there;
it installs no top-level `configs`), so `fedjax-dx run --config=heart_disease` finds them
by name from any directory, and a config that varies another imports it as
`from fedjax_dx.configs import heart_disease`.
"""
