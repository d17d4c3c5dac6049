"""What the commands print, built from resource bodies and a `now`: rows, tables, lines. No API calls here."""
