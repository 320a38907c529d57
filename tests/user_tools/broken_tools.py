"""A module that fails to import: ``exai serve`` must refuse to start, naming it."""

raise RuntimeError("the team's tools need a setting that is missing")
