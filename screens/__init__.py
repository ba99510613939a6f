"""atc's Textual UI. Screens call functions in ``console``; they hold no SQL."""
