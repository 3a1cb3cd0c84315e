"""Items and how many of each are in stock."""


class Inventory:
    def __init__(self):
        self._stock = {}

    def add(self, name, quantity=1):
        if not name:
            raise ValueError("an item needs a name")
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        self._stock[name] = self._stock.get(name, 0) + quantity
        return self._stock[name]

    def remove(self, name, quantity=1):
        if name not in self._stock:
            raise KeyError(name)
        self._stock[name] -= quantity
        return self._stock[name]

    def count(self, name):
        return self._stock.get(name, 0)

    def items(self):
        return dict(sorted(self._stock.items()))
