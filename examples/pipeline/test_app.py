"""The example app's unit tests: the pipeline's test stage runs `python3 -m unittest -q`."""

import unittest

import greeting


class GreetingTest(unittest.TestCase):
    def test_names_the_version(self):
        self.assertEqual(greeting.greet("v7"), "hello from v7\n")

    def test_delay_is_in_seconds_and_never_negative(self):
        self.assertEqual(greeting.delay_seconds({"delay_ms": 250}), 0.25)
        self.assertEqual(greeting.delay_seconds({"delay_ms": -5}), 0)
        self.assertEqual(greeting.delay_seconds({}), 0)


if __name__ == "__main__":
    unittest.main()
