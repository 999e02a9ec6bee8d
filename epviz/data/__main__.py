"""`python -m epviz.data --check`: find (or fetch) the Fashion-MNIST files and report."""

from epviz.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Check that the Fashion-MNIST files can be found (and fetch them if not).")
    parser.add_argument("--check", action="store_true", help="load both splits and report where they were found")
    parser.add_argument("--no-download", action="store_true", help="do not try torchvision's download")
    args = parser.parse_args()
    try:
        for split in ("train", "test"):
            images, _ = load_fashion_mnist(split, download=not args.no_download)
            print(f"Fashion-MNIST {split}: {len(images)} items")
    except (FashionMNISTNotFound, ValueError) as err:
        print(err, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
