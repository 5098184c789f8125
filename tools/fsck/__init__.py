"""fsck.pnova: the command-line front end of pnova.fsck."""
