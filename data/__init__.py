"""This folder is installed as the package `minisd.data` (see pyproject.toml), so the files the
library reads at run time ship inside its wheel. Code finds them through `minisd.package_data`."""
