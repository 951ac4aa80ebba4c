def main(): print("cli"); return 0
