"""The one piece of logic the example app has, kept apart so that test_app.py can test it."""


def greet(version):
    """The body of GET /: names the version that answers."""
    return "hello from %s\n" % version


def delay_seconds(settings):
    """How long GET / waits, from settings.json's delay_ms (missing or negative: none)."""
    return max(0, int(settings.get("delay_ms", 0))) / 1000.0
