import unittest

from inventory.api import route
from inventory.store import Inventory


class ApiTest(unittest.TestCase):
    def test_post_then_list(self):
        inventory = Inventory()
        status, answer = route(inventory, "POST", "/items", {"name": "gear", "quantity": 2})
        self.assertEqual((status, answer["count"]), (201, 2))
        self.assertEqual(route(inventory, "GET", "/items"), (200, {"items": {"gear": 2}}))

    def test_bad_item_is_400(self):
        status, _ = route(Inventory(), "POST", "/items", {"quantity": 1})
        self.assertEqual(status, 400)

    def test_unknown_route_is_404(self):
        self.assertEqual(route(Inventory(), "GET", "/nope")[0], 404)


if __name__ == "__main__":
    unittest.main()
