"""The models a request field needs: the safety checker and prompt expansion, and where they live."""
