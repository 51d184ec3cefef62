"""What an exchange cost, and where that price came from."""
