"""Progressive Low Rank Decomposition: factorize, heal, repeat; each step yields a smaller member.

plrd/ depends on family/ (the low-rank model class and the registry) and never on server/.
"""
