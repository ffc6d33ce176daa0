"""Row formats and prompt templates: pure Python, below the recipe (config/ validates data.format and data.template
against them) and below everything that reads or renders rows."""
