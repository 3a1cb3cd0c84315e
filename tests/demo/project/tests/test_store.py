import unittest

from inventory.store import Inventory


class StoreTest(unittest.TestCase):
    def test_add_counts_up(self):
        inventory = Inventory()
        inventory.add("bolt", 3)
        self.assertEqual(inventory.add("bolt", 2), 5)

    def test_add_refuses_nonsense(self):
        with self.assertRaises(ValueError):
            Inventory().add("", 1)
        with self.assertRaises(ValueError):
            Inventory().add("nut", 0)

    def test_remove_counts_down(self):
        inventory = Inventory()
        inventory.add("nut", 4)
        self.assertEqual(inventory.remove("nut", 3), 1)


if __name__ == "__main__":
    unittest.main()
