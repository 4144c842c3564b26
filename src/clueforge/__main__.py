from clueforge.cli import app

app()
